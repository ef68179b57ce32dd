"""Bad input to the data stream: each case is a counted skip or a clear DataError within seconds."""

import json
import time

import pytest

from sip.config import ConfigError, DataConfig, HFDataConfig, SipConfig, load_config
from sip.train.data import DataError, Sampler, check_source, iter_documents, train_tokenizer


def hf_config(path, builder="json", **hf) -> DataConfig:
    return DataConfig(
        source="hf", hf=HFDataConfig(path=builder, data_files=str(path), eval_docs=1, **hf),
        suffix_tokens=8, min_prefix_tokens=4, max_seq_tokens=24, vocab_size=300, tokenizer_docs=50,
    )


def docs(i: int) -> str:
    return f"Café number {i} sits by the river, under the hills."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": docs(i) * 3}) for i in range(60)))
    return train_tokenizer(hf_config(path), tmp_path_factory.mktemp("tok_out"))


@pytest.mark.parametrize("builder", ["json", "text"])
def test_undecodable_bytes_skip_only_their_document(tmp_path, tokenizer, builder):
    lines = [json.dumps({"text": docs(i)}, ensure_ascii=False).encode() if builder == "json" else docs(i).encode()
             for i in range(12)]
    lines[6] = lines[6].replace(b"river", b"riv\xff\xfeer")  # not UTF-8
    path = tmp_path / f"docs.{builder}"
    path.write_bytes(b"\n".join(lines))
    sampler = Sampler(hf_config(path, builder), tokenizer)
    samples = sampler.take(100)
    assert sampler.skipped == {"undecodable": 1}
    assert sampler.read == 11 and len(samples) == 10, "every other document of the file is read"
    assert all("\ufffd" not in s.prefix + s.suffix for s in samples)


def test_latin1_file_names_the_file_and_the_setting(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes("\n".join(json.dumps({"text": docs(i)}, ensure_ascii=False) for i in range(20)).encode("latin-1"))
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        list(iter_documents(hf_config(path)))
    assert time.perf_counter() - start < 2
    first_bad = path.read_bytes().index("é".encode("latin-1"))
    assert str(path) in str(err.value) and f"byte {first_bad}" in str(err.value)
    assert "data.hf.encoding=latin-1" in str(err.value)
    texts = [text for _, text, _ in iter_documents(hf_config(path, encoding="latin-1"))]
    assert texts == [docs(i) for i in range(1, 20)]


def test_a_utf8_file_declared_utf8_keeps_its_good_documents(tmp_path):
    """A file whose corrupt documents look like another encoding: declaring utf-8 skips just them."""
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": docs(i)}).encode() for i in range(10)]  # ASCII-escaped: no raw non-ASCII
    lines[2] = b'{"text": "caf\xe9 one"}'
    lines[5] = b'{"text": "caf\xe9 two"}'
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError):
        list(iter_documents(hf_config(path)))
    texts = [text for _, text, _ in iter_documents(hf_config(path, encoding="utf-8"))]
    assert len(texts) == 9 and sum("\ufffd" in t for t in texts) == 2


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(ConfigError, match="data.hf.encoding: Value error, unknown encoding 'latin-99'"):
        load_config(None, ["data.source=hf", "data.hf.path=json", "data.hf.encoding=latin-99"])


def test_ten_megabyte_document_costs_seconds_and_still_yields_samples(tmp_path, tokenizer):
    huge = " ".join(f"word{i % 5000} is near the river bank." for i in range(320_000))
    assert len(huge) > 10_000_000
    path = tmp_path / "huge.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in [docs(0), docs(1), huge, docs(2)]))
    cfg = hf_config(path)
    start = time.perf_counter()
    train_tokenizer(cfg, tmp_path / "tok")
    samples = Sampler(cfg, tokenizer).take(10)
    chunks = Sampler(cfg.model_copy(update={"cut": "chunks"}), tokenizer)
    chunk_samples = chunks.take(100_000)
    base_docs = Sampler(cfg, tokenizer).documents(10, cfg.max_seq_tokens)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"{elapsed:.1f}s"
    assert [s.id for s in samples] == ["hf:0:0", "hf:0:1", "hf:0:2"]
    assert chunks.truncated == 1, "the document past data.max_document_chars is counted"
    huge_chunks = [s for s in chunk_samples if s.id.startswith("hf:0:1:")]
    assert 1000 < len(huge_chunks) < cfg.max_document_chars // cfg.suffix_tokens, "bounded by the character cap"
    assert len(base_docs) == 3 and len(base_docs[1]) == cfg.max_seq_tokens


def test_missing_data_file_is_named_before_anything_is_read(tmp_path):
    from sip.train.base import ensure_base

    cfg = SipConfig(data=hf_config(tmp_path / "nowhere" / "*.jsonl"))
    with pytest.raises(DataError, match=r"data.hf.data_files: no file matches .*nowhere"):
        ensure_base(cfg)  # checked in the driver, before a build task starts


def test_a_directory_as_data_file_is_refused_before_anything_is_read(tmp_path):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": docs(i)}) for i in range(3)))
    for data_files in (str(tmp_path), [str(tmp_path / "docs.jsonl"), str(tmp_path)]):
        cfg = DataConfig(source="hf", hf=HFDataConfig(path="json", data_files=data_files, eval_docs=1))
        with pytest.raises(DataError, match=rf"'{tmp_path}' is a directory, not a data file; .* e.g. "
                                            rf"data.hf.data_files={tmp_path}/\*.jsonl"):
            check_source(cfg)
    assert len(list(iter_documents(hf_config(tmp_path / "*.jsonl")))) == 2, "the glob it suggests reads the files"


def test_a_reader_failure_mid_stream_names_the_source(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "no closing quote}\n{"text": "fine"}\n')
    with pytest.raises(DataError, match="reading data.hf.data_files=.*broken.jsonl.* failed"):
        list(iter_documents(hf_config(path)))


def test_held_out_question_and_sheet_prompts_change_neither_the_base_key_nor_the_resume_fingerprint():
    from sip.checkpoint import fingerprint
    from sip.config import load_config
    from sip.train.base import base_key

    default = load_config(None, [])
    shaped = load_config(None, ["data.world.eval_question_prefixes=3", "data.world.eval_sheet_prefixes=0"])
    assert base_key(default) == base_key(shaped) == "90be2f1e675c7a61", "bases built before them stay valid"
    assert fingerprint(default) == fingerprint(shaped), "so do checkpoints written before them"
    assert base_key(load_config(None, ["data.world.eval_fact_prefixes=3"])) != base_key(default)


def test_base_key_fingerprints_the_data_file(tmp_path):
    from sip.train.base import base_key

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": docs(i)}) for i in range(50)))
    cfg = SipConfig(data=hf_config(path))
    key = base_key(cfg)
    assert base_key(cfg) == key
    assert base_key(cfg.model_copy(update={"data": cfg.data.model_copy(update={"cut": "chunks"})})) == key, \
        "the base does not depend on how SIP cuts samples"
    cut_differently = cfg.data.model_copy(update={"suffix_tokens": 32, "min_prefix_tokens": 4})
    assert base_key(cfg.model_copy(update={"data": cut_differently})) == key, "nor on the suffix's length"
    longer_rows = cfg.data.model_copy(update={"max_seq_tokens": 256})
    assert base_key(cfg.model_copy(update={"data": longer_rows})) != key, "the base's rows are max_seq_tokens long"
    whole_batches = cfg.base.model_copy(update={"micro_batch_size": 0})
    assert base_key(cfg.model_copy(update={"base": whole_batches})) == key, "micro-batches take the same step"
    path.write_text("\n".join(json.dumps({"text": docs(i)}) for i in range(51)))
    assert base_key(cfg) != key, "a changed data file builds a new base"
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 300_000)
    big_cfg = SipConfig(data=hf_config(big))
    big_key = base_key(big_cfg)
    with open(big, "r+b") as handle:  # same size, one byte of the head changed
        handle.write(b"y")
    assert base_key(big_cfg) != big_key
    hub = SipConfig(data=DataConfig(source="hf", hf=HFDataConfig(path="someone/corpus")))
    pinned = SipConfig(data=DataConfig(source="hf", hf=HFDataConfig(path="someone/corpus", revision="abc123")))
    assert base_key(hub) != base_key(pinned)
