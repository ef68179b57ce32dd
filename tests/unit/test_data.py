import json

import pytest

from sip.config import DataConfig, HFDataConfig
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
    state = first.state_dict()
    expected = first.take(7)
    resumed = Sampler(cfg, tokenizer, state)
    assert resumed.take(7) == expected
    assert resumed.skipped == first.skipped and resumed.read == first.read


def chunked(cfg, **fields):
    return cfg.model_copy(update={"cut": "chunks", **fields})


def test_chunks_cover_every_token_after_the_first_min_prefix(cfg, tokenizer):
    from sip.train.data import chunk_samples, document_ids

    text = " ".join(f"w{i}" for i in range(120))
    ids, truncated = document_ids(cfg, tokenizer, text)
    assert not truncated and ids == tokenizer.encode(text, add_special_tokens=False)
    samples = chunk_samples(chunked(cfg), tokenizer, "doc", ids, None)
    n, m = cfg.suffix_tokens, cfg.min_prefix_tokens
    assert len(samples) == (len(ids) - m) // n
    assert [s.id for s in samples] == [f"doc:{c}" for c in range(len(samples))]
    covered = [t for s in samples for t in s.suffix_ids]
    assert covered == ids[m : m + n * len(samples)], "consecutive N-token chunks, none skipped"
    for chunk, s in enumerate(samples):
        split = m + chunk * n
        assert s.prefix_ids == ids[max(0, split - (cfg.max_seq_tokens - n)) : split]
    assert len(chunk_samples(chunked(cfg, max_samples_per_document=2), tokenizer, "doc", ids, None)) == 2


@pytest.mark.parametrize("cut", ["random", "chunks"])
def test_sampler_resumes_exactly_inside_a_document(cfg, tokenizer, cut):
    """A batch may end between two chunks of one document; the state says which chunk comes next."""
    cfg = cfg.model_copy(update={"cut": cut})
    uninterrupted = Sampler(cfg, tokenizer)
    for _ in range(3):
        uninterrupted.take(5)
    state = uninterrupted.state_dict()
    if cut == "chunks":
        assert state["next_chunk"] > 0, "this stream's 15th sample is not a document's last chunk"
    expected = [uninterrupted.take(5) for _ in range(4)]
    resumed = Sampler(cfg, tokenizer, json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert [resumed.take(5) for _ in range(4)] == expected
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_chunks_take_many_stable_unique_samples_per_document(cfg, tokenizer):
    one = Sampler(cfg, tokenizer).take(1000)
    many = Sampler(chunked(cfg), tokenizer)
    samples = many.take(1000)
    assert len(samples) > 2 * len(one)
    assert len({s.id for s in samples}) == len(samples)
    assert samples == Sampler(chunked(cfg), tokenizer).take(1000)
    assert many.read == 110 and many.skipped == {"empty": 11, "not_text": 11, "too_short": 11}
    capped = Sampler(chunked(cfg, max_samples_per_document=1), tokenizer).take(1000)
    assert len(capped) == len(one) and {s.id.rsplit(":", 1)[1] for s in capped} == {"0"}


def test_base_documents_do_not_depend_on_the_cut(cfg, tokenizer):
    assert Sampler(cfg, tokenizer).documents(20, 16) == Sampler(chunked(cfg), tokenizer).documents(20, 16)


def test_held_out_cut_follows_the_training_cut(cfg, tokenizer):
    from sip.train.data import chunk_splits, document_ids

    text = " ".join(f"w{i}" for i in range(120))
    ids, _ = document_ids(cfg, tokenizer, text)
    grid = {tuple(ids[split : split + cfg.suffix_tokens]) for split in chunk_splits(chunked(cfg), len(ids))}
    held_out = [cut_sample(chunked(cfg), tokenizer, f"eval:{k}", text, None) for k in range(20)]
    assert {tuple(s.suffix_ids) for s in held_out} <= grid
    assert len({tuple(s.suffix_ids) for s in held_out}) > 1


def test_world_documents_cut_into_chunks_keep_their_truth(tmp_path):
    world_cfg = DataConfig(vocab_size=300, tokenizer_docs=200, cut="chunks")
    tok = train_tokenizer(world_cfg, tmp_path)
    sampler = Sampler(world_cfg, tok)
    samples = sampler.take(60)
    docs = {s.id.rsplit(":", 1)[0] for s in samples}
    assert len(docs) < len(samples) / 2, "a world document gives several chunks"
    by_doc = {}
    for s in samples:
        by_doc.setdefault(s.id.rsplit(":", 1)[0], set()).add(s.truth["subject"])
    assert all(len(subjects) == 1 for subjects in by_doc.values())
