"""Documents in, samples out: the streaming sources, the tokenizer and the prefix/suffix cut.

The stream is deterministic for a seed, and its whole position is one number (the index of the
next document), so a checkpoint stores it and a resumed run continues where it stopped.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from sip.train.config import DataConfig, PolicyConfig
from sip.train.records import Sample

EOS = "<|endoftext|>"

Document = tuple[int, Any, dict[str, Any] | None]  # (index in the stream, raw text, truth)


def iter_documents(cfg: DataConfig, start: int = 0) -> Iterator[Document]:
    """Training documents from index `start` on; raw text is checked by the sampler, not here."""
    if cfg.source == "world":
        from sip.train.world import World

        for doc in World.from_config(cfg.world).documents(seed=cfg.seed, start=start):
            yield doc.index, doc.text, {"subject": doc.subject}
        return
    rows = _hf_rows(cfg)
    held_out = cfg.hf.eval_docs
    for index, row in enumerate(islice(rows, held_out + start, None), start=start):
        yield index, row.get(cfg.hf.text_field) if isinstance(row, dict) else None, None


def iter_eval_documents(cfg: DataConfig) -> Iterator[Document]:
    """The held-out head of an HF source (the world keeps its own evaluation prefixes)."""
    for index, row in enumerate(islice(_hf_rows(cfg), cfg.hf.eval_docs)):
        yield index, row.get(cfg.hf.text_field) if isinstance(row, dict) else None, None


def _hf_rows(cfg: DataConfig):
    import datasets

    hf = cfg.hf
    return datasets.load_dataset(hf.path, hf.name, data_files=hf.data_files, split=hf.split, streaming=hf.streaming)


def train_tokenizer(cfg: DataConfig, out_dir: Path):
    """A byte-level BPE tokenizer trained on the first documents of the stream, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (text for _, text, _ in iter_documents(cfg) if isinstance(text, str) and text.strip())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(islice(texts, cfg.tokenizer_docs), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_or_train_tokenizer(data: DataConfig, policy: PolicyConfig, out_dir: Path):
    """The policy's own tokenizer when continuing from an HF folder, else a new one for this corpus."""
    from transformers import AutoTokenizer

    if policy.init != "scratch":
        tokenizer = AutoTokenizer.from_pretrained(policy.init)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(out_dir)
        return tokenizer
    return train_tokenizer(data, out_dir)


class Sampler:
    """Cuts each document into one (prefix, suffix) sample at a random, seeded split point.

    suffix = the next `suffix_tokens` tokens; prefix = up to `max_seq_tokens - suffix_tokens`
    tokens before it, at least `min_prefix_tokens`. Documents that are empty, not text, or too
    short are skipped and counted by reason.
    """

    def __init__(self, cfg: DataConfig, tokenizer, state: dict | None = None):
        state = state or {}
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.next_index: int = state.get("next_document", 0)
        self.read: int = state.get("documents_read", 0)
        self.skipped: Counter[str] = Counter(state.get("skipped", {}))
        self._docs = iter_documents(cfg, self.next_index)

    def state(self) -> dict:
        """Everything a checkpoint needs to continue the stream exactly here."""
        return {"next_document": self.next_index, "documents_read": self.read, "skipped": dict(self.skipped)}

    def take(self, n: int) -> list[Sample]:
        """The next `n` samples (fewer only when the stream ends)."""
        samples: list[Sample] = []
        for index, text, truth in self._valid():
            sample = cut_sample(self.cfg, self.tokenizer, f"{self.cfg.source}:{self.cfg.seed}:{index}", text, truth)
            if sample is None:
                self.skipped["too_short"] += 1
                continue
            samples.append(sample)
            if len(samples) == n:
                break
        return samples

    def documents(self, n: int, max_tokens: int) -> list[list[int]]:
        """The next `n` whole documents as token ids, cut to `max_tokens`: base pretraining reads these."""
        docs: list[list[int]] = []
        for _, text, _ in self._valid():
            ids = self.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
            if len(ids) < 2:
                self.skipped["too_short"] += 1
                continue
            docs.append(ids)
            if len(docs) == n:
                break
        return docs

    def _valid(self):
        for index, text, truth in self._docs:
            self.next_index = index + 1
            self.read += 1
            reason = skip_reason(text)
            if reason:
                self.skipped[reason] += 1
                continue
            yield index, text, truth


def skip_reason(text: Any) -> str | None:
    if not isinstance(text, str):
        return "not_text"
    if not text.strip():
        return "empty"
    if "\ufffd" in text:
        return "undecodable"
    return None


def cut_sample(cfg: DataConfig, tokenizer, sample_id: str, text: str, truth: dict | None) -> Sample | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = cfg.suffix_tokens
    last_split = len(ids) - n
    if last_split < cfg.min_prefix_tokens:
        return None
    split = random.Random(f"split:{sample_id}").randint(cfg.min_prefix_tokens, last_split)
    prefix_ids = ids[max(0, split - (cfg.max_seq_tokens - n)) : split]
    suffix_ids = ids[split : split + n]
    return Sample(
        id=sample_id,
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        prefix=tokenizer.decode(prefix_ids),
        suffix=tokenizer.decode(suffix_ids),
        truth=truth,
    )
