import json

import pytest

from sip.train.config import DataConfig, HFDataConfig
from sip.train.data import Sampler, cut_sample, train_tokenizer


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    rows = []
    for i in range(120):
        if i % 10 == 3:
            rows.append({"text": ""})  # empty
        elif i % 10 == 5:
            rows.append({"text": 42})  # not text
        elif i % 10 == 7:
            rows.append({"text": "too short"})
        else:
            rows.append({"text": f"Document {i} talks about rivers and hills. " * (3 + i % 4)})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def cfg(jsonl):
    return DataConfig(
        source="hf", hf=HFDataConfig(path="json", data_files=str(jsonl), eval_docs=10),
        suffix_tokens=8, min_prefix_tokens=4, max_seq_tokens=24, vocab_size=300, tokenizer_docs=100,
    )


@pytest.fixture(scope="module")
def tokenizer(cfg, tmp_path_factory):
    return train_tokenizer(cfg, tmp_path_factory.mktemp("tok"))


def test_cut_is_a_contiguous_capped_slice(cfg, tokenizer):
    text = "alpha beta gamma delta " * 20
    ids = tokenizer.encode(text, add_special_tokens=False)
    for k in range(30):
        s = cut_sample(cfg, tokenizer, f"x:{k}", text, None)
        assert len(s.suffix_ids) == cfg.suffix_tokens
        assert cfg.min_prefix_tokens <= len(s.prefix_ids) <= cfg.max_seq_tokens - cfg.suffix_tokens
        joined = s.prefix_ids + s.suffix_ids
        starts = [i for i in range(len(ids)) if ids[i : i + len(joined)] == joined]
        assert starts, "prefix + suffix must be a contiguous slice of the document"
        assert s.suffix == tokenizer.decode(s.suffix_ids)
    assert cut_sample(cfg, tokenizer, "x:0", text, None) == cut_sample(cfg, tokenizer, "x:0", text, None)
    assert cut_sample(cfg, tokenizer, "x:short", "a b", None) is None


def test_split_points_vary(cfg, tokenizer):
    text = "alpha beta gamma delta " * 20
    text = " ".join(f"w{i}" for i in range(200))
    cuts = [cut_sample(cfg, tokenizer, f"x:{k}", text, None) for k in range(30)]
    assert len({tuple(s.suffix_ids) for s in cuts}) > 10


def test_sampler_skips_and_counts_bad_documents(cfg, tokenizer):
    sampler = Sampler(cfg, tokenizer)
    samples = sampler.take(1000)
    assert sampler.read == 110  # 120 rows minus 10 held out for evaluation
    assert sampler.skipped == {"empty": 11, "not_text": 11, "too_short": 11}
    assert len(samples) == 110 - 33
    assert len({s.id for s in samples}) == len(samples)


def test_sampler_resumes_exactly_from_its_state(cfg, tokenizer):
    first = Sampler(cfg, tokenizer)
    first.take(5)
    state = first.state()
    expected = first.take(7)
    resumed = Sampler(cfg, tokenizer, state)
    assert resumed.take(7) == expected
    assert resumed.skipped == first.skipped and resumed.read == first.read
