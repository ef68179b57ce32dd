"""Documents in, samples out: the streaming sources, the tokenizer and the prefix/suffix cut.

The stream is deterministic for a seed. Its position is the index of the next document and, with
`data.cut=chunks`, the chunk to continue with inside it, so a checkpoint stores it and a resumed
run continues exactly where it stopped.

Bad input never stops the stream with a traceback: a document that is not text, empty, has bytes
that do not decode, or is too short is skipped and counted by reason; a local file that is not in
the configured encoding, a data file that does not exist, or a reader that fails mid-stream is a
`DataError` that names the file and what to set.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import random
from collections import Counter, deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from sip.config import DataConfig, PolicyConfig
from sip.records import Sample

EOS = "<|endoftext|>"

Document = tuple[int, Any, dict[str, Any] | None]  # (index in the stream, raw text, truth)

# `datasets` builders that decode bytes themselves and accept `encoding` / `encoding_errors`.
TEXT_BUILDERS = ("json", "text", "csv")
FILE_BUILDERS = (*TEXT_BUILDERS, "parquet", "arrow")  # builder names, never taken for a local folder
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".tar")
SNIFF_BYTES = 256 << 10  # bytes of each local file checked for its encoding before reading
SNIFF_FILES = 16  # files checked; a corpus in the wrong encoding shows it in its first files
FINGERPRINT_BYTES = 64 << 10  # head and tail bytes hashed into a file's fingerprint
WINDOW_MARGIN = 8  # tokens past the ones needed, so a cut inside a word never changes them


class DataError(ValueError):
    """A data source that cannot be read as configured; the message names the file and the fix."""


def iter_documents(cfg: DataConfig, start: int = 0) -> Iterator[Document]:
    """Training documents from index `start` on; raw text is checked by the sampler, not here."""
    if cfg.source == "world":
        from sip.world import World

        for doc in World.from_config(cfg.world).documents(seed=cfg.seed, start=start):
            yield doc.index, doc.text, {"subject": doc.subject}
        return
    for index, row in enumerate(_hf_rows(cfg, cfg.hf.eval_docs + start), start=start):
        yield index, row.get(cfg.hf.text_field) if isinstance(row, dict) else None, None


def iter_eval_documents(cfg: DataConfig) -> Iterator[Document]:
    """The held-out head of an HF source (the world keeps its own evaluation prefixes)."""
    for index, row in enumerate(_hf_rows(cfg, 0, cfg.hf.eval_docs)):
        yield index, row.get(cfg.hf.text_field) if isinstance(row, dict) else None, None


def _hf_rows(cfg: DataConfig, start: int, stop: int | None = None):
    """Rows `start` to `stop` of an HF source; a reader that fails is a DataError saying where."""
    import datasets

    hf = cfg.hf
    check_source(cfg)
    options = {}
    if hf.path in TEXT_BUILDERS:
        encoding = hf.encoding or "utf-8"
        # The json builder hands bytes to pyarrow unchecked when encoding is literally "utf-8", and
        # one bad byte then fails the whole file; any other spelling makes it decode each chunk
        # itself with `encoding_errors`, so a bad byte becomes U+FFFD and only its document is skipped.
        if codecs.lookup(encoding).name == "utf-8":
            encoding = "utf8"
        options = {"encoding": encoding, "encoding_errors": "replace"}
    try:
        rows = datasets.load_dataset(
            hf.path, hf.name, data_files=hf.data_files, split=hf.split, streaming=hf.streaming,
            revision=hf.revision, **options,
        )
        yield from islice(rows, start, stop)
    except Exception as err:  # noqa: BLE001 - any failure of the reader, reported with its source
        raise DataError(f"reading {_describe_source(cfg)} failed: {type(err).__name__}: {err}") from None


def _describe_source(cfg: DataConfig) -> str:
    hf = cfg.hf
    return f"data.hf.data_files={hf.data_files!r}" if hf.data_files else f"data.hf.path={hf.path!r}"


def local_files(cfg: DataConfig) -> list[Path] | None:
    """The local files an HF source reads, in order; None for a hub dataset or remote URLs."""
    hf = cfg.hf
    if hf.data_files is None:
        folder = Path(hf.path).expanduser()
        if hf.path in FILE_BUILDERS or not folder.is_dir():
            return None  # a hub name or a builder without files
        return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    patterns = [hf.data_files] if isinstance(hf.data_files, str) else list(hf.data_files)
    if any("://" in p for p in patterns):
        return None
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"data.hf.data_files: no file matches {pattern!r} (relative paths start in {os.getcwd()})")
        files.extend(Path(m) for m in matches if Path(m).is_file())
    return files


def check_source(cfg: DataConfig) -> None:
    """Checks an HF source's local files before anything reads them: they exist, are files, and are
    in the configured encoding. Cheap (the heads of the first files), so every reader calls it."""
    if cfg.source != "hf":
        return
    hf = cfg.hf
    for pattern in [hf.data_files] if isinstance(hf.data_files, str) else hf.data_files or []:
        if "://" not in pattern and os.path.isdir(os.path.expanduser(pattern)):
            ext = {"json": ".jsonl", "text": ".txt"}.get(hf.path, f".{hf.path}" if hf.path in FILE_BUILDERS else "")
            raise DataError(f"data.hf.data_files: {pattern!r} is a directory, not a data file; name its files "
                            f"with a glob, e.g. data.hf.data_files={os.path.join(pattern, '*' + ext)}")
    files = local_files(cfg)
    if not files or hf.path not in TEXT_BUILDERS or hf.encoding is not None:
        return  # an explicit encoding is the user's word: undecodable documents are skipped and counted
    for path in [f for f in files if not f.name.endswith(COMPRESSED_SUFFIXES)][:SNIFF_FILES]:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
        lines = head.split(b"\n")
        if len(head) == SNIFF_BYTES:
            lines = lines[:-1]  # may end inside a character
        offset, non_ascii, bad, first_bad = 0, 0, 0, None
        for line in lines:
            if not line.isascii():
                non_ascii += 1
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad += 1
                    first_bad = offset + err.start if first_bad is None else first_bad
            offset += len(line) + 1
        # A few bad lines in UTF-8 text are corrupt documents (skipped and counted); most lines that
        # carry non-ASCII bytes failing means the file is in another encoding.
        if bad >= 2 and 2 * bad > non_ascii:
            raise DataError(
                f"{path} is not UTF-8: {bad} of the first {len(lines)} lines do not decode (the first at byte "
                f"{first_bad}). Set data.hf.encoding to the file's encoding (e.g. data.hf.encoding=latin-1), "
                "or data.hf.encoding=utf-8 to skip the undecodable documents and read the rest"
            )


def data_fingerprint(cfg: DataConfig) -> dict | None:
    """What identifies the data an HF source reads beyond its config: each local file's path, size,
    mtime and a hash of its head and tail (all of it when small); for a hub dataset its name and
    revision. None for the world, which its config fully determines."""
    if cfg.source != "hf":
        return None
    files = local_files(cfg)
    if files is None:
        return {"hub": cfg.hf.path, "name": cfg.hf.name, "revision": cfg.hf.revision}
    return {"files": [_file_fingerprint(path) for path in files]}


def _file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if stat.st_size <= 2 * FINGERPRINT_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(FINGERPRINT_BYTES))
            handle.seek(-FINGERPRINT_BYTES, os.SEEK_END)
            digest.update(handle.read(FINGERPRINT_BYTES))
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def train_tokenizer(cfg: DataConfig, out_dir: Path):
    """A byte-level BPE tokenizer trained on the first documents of the stream, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (text[: cfg.max_document_chars] for _, text, _ in iter_documents(cfg) if skip_reason(text) is None)
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


def check_policy_init(policy: PolicyConfig) -> None:
    """A policy to continue from that transformers can load: a folder with its config.json, or a hub id
    it can resolve. Read in the driver, so a wrong path is refused before any actor starts."""
    if policy.init == "scratch":
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(policy.init)
    except (OSError, ValueError) as err:
        raise DataError(f"policy.init={policy.init} is not a model transformers can load (a Hugging Face folder "
                        f"with config.json, or a hub id): {str(err).splitlines()[0]}") from None


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
    """Cuts documents into (prefix, suffix) samples, as `data.cut` says.

    random: one sample per document at a seeded split point; chunks: every N-token chunk after the
    first `min_prefix_tokens` tokens (up to `max_samples_per_document`). The suffix is N =
    `suffix_tokens` tokens, the prefix up to `max_seq_tokens - N` tokens right before it. Documents
    that are empty, not text, undecodable or too short are skipped and counted by reason.

    The state is {next_document, next_chunk, documents_read, skipped, documents_truncated}: a
    batch may end inside a document's chunks, and `Sampler(cfg, tokenizer, state)` continues with
    chunk `next_chunk` of document `next_document` (0: the document has not been read yet).
    """

    def __init__(self, cfg: DataConfig, tokenizer, state: dict | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.load_state_dict(state or {})

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream where `state_dict` was taken."""
        self.next_index: int = state.get("next_document", 0)
        self.next_chunk: int = state.get("next_chunk", 0)
        self.read: int = state.get("documents_read", 0)
        self.skipped: Counter[str] = Counter(state.get("skipped", {}))
        self.truncated: int = state.get("documents_truncated", 0)
        self._resume_chunk = self.next_chunk
        self._pending: deque[tuple[int, int, Sample]] = deque()  # (document, chunk, sample) not yet taken
        self._docs = self._valid(iter_documents(self.cfg, self.next_index))

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to continue the stream exactly here."""
        return {
            "next_document": self.next_index,
            "next_chunk": self.next_chunk,
            "documents_read": self.read,
            "skipped": dict(self.skipped),
            "documents_truncated": self.truncated,
        }

    def take(self, n: int) -> list[Sample]:
        """The next `n` samples (fewer only when the stream ends)."""
        samples: list[Sample] = []
        while len(samples) < n:
            if not self._pending:
                document = next(self._docs, None)
                if document is None:
                    break
                self._pending.extend(self._cut(*document))
                continue
            index, _, sample = self._pending.popleft()
            samples.append(sample)
            self.next_index, self.next_chunk = (index, self._pending[0][1]) if self._pending else (index + 1, 0)
        return samples

    def documents(self, n: int, max_tokens: int) -> list[list[int]]:
        """The next `n` whole documents as token ids, cut to `max_tokens`: base pretraining reads these."""
        if self._pending:  # the rest of a document partly taken as samples is not reused whole
            self._pending.clear()
            self.next_index, self.next_chunk = self.next_index + 1, 0
        docs: list[list[int]] = []
        for _, text, _, first_chunk in self._docs:
            if first_chunk:
                continue
            ids, _ = document_ids(self.cfg, self.tokenizer, text, max_tokens)
            if len(ids) < 2:
                self.skipped["too_short"] += 1
                continue
            docs.append(ids[:max_tokens])
            if len(docs) == n:
                break
        return docs

    def _valid(self, documents: Iterator[Document]):
        """Readable documents with the chunk to start from: 0, or where a resumed state left off."""
        for index, text, truth in documents:
            first_chunk, self._resume_chunk = self._resume_chunk, 0
            self.next_index, self.next_chunk = index + 1, 0
            if first_chunk:  # read and counted before the checkpoint
                yield index, text, truth, first_chunk
                continue
            self.read += 1
            reason = skip_reason(text)
            if reason:
                self.skipped[reason] += 1
                continue
            yield index, text, truth, 0

    def _cut(self, index: int, text: str, truth: dict | None, first_chunk: int) -> list[tuple[int, int, Sample]]:
        cfg = self.cfg
        doc_id = f"{cfg.source}:{cfg.seed}:{index}"
        if cfg.cut == "random":
            ids, truncated = document_ids(cfg, self.tokenizer, text)
            sample = random_cut(cfg, self.tokenizer, doc_id, ids, truth)
            cut = [] if sample is None else [(index, 0, sample)]
        else:
            wanted = cfg.max_samples_per_document
            need = None if wanted is None else cfg.min_prefix_tokens + wanted * cfg.suffix_tokens
            ids, truncated = document_ids(cfg, self.tokenizer, text, need)
            cut = [(index, chunk, sample) for chunk, sample in enumerate(chunk_samples(cfg, self.tokenizer, doc_id, ids, truth))]
        if first_chunk:
            return cut[first_chunk:]
        self.truncated += truncated
        if not cut:
            self.skipped["too_short"] += 1
        return cut


def skip_reason(text: Any) -> str | None:
    if not isinstance(text, str):
        return "not_text"
    if not text.strip():
        return "empty"
    if "\ufffd" in text:
        return "undecodable"
    return None


def document_ids(cfg: DataConfig, tokenizer, text: str, tokens: int | None = None) -> tuple[list[int], bool]:
    """Token ids of the document's first `max_document_chars` characters, or, with `tokens`, of just
    enough of them for that many (a window that doubles until it yields them), so a huge document
    costs what the cut can use. Returns the ids and whether characters past the cap went unread."""
    limit = min(len(text), cfg.max_document_chars)
    window = limit if tokens is None else min(limit, 16 * (tokens + WINDOW_MARGIN))
    while True:
        ids = tokenizer.encode(text[:window], add_special_tokens=False)
        if window == limit:
            return ids, limit < len(text)
        if len(ids) >= tokens + WINDOW_MARGIN:
            return ids[:tokens], False
        window = min(limit, 2 * window)


def make_sample(cfg: DataConfig, tokenizer, sample_id: str, ids: list[int], split: int, truth: dict | None) -> Sample:
    """The N tokens from `split` on as the suffix, up to `max_seq_tokens - N` tokens before it as the prefix."""
    n = cfg.suffix_tokens
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


def random_cut(cfg: DataConfig, tokenizer, sample_id: str, ids: list[int], truth: dict | None) -> Sample | None:
    """One sample split at a uniform point seeded by its id; None when the document is too short."""
    last_split = len(ids) - cfg.suffix_tokens
    if last_split < cfg.min_prefix_tokens:
        return None
    split = random.Random(f"split:{sample_id}").randint(cfg.min_prefix_tokens, last_split)
    return make_sample(cfg, tokenizer, sample_id, ids, split, truth)


def chunk_splits(cfg: DataConfig, n_ids: int) -> range:
    """Where each N-token suffix chunk starts: after the first `min_prefix_tokens`, every N tokens
    while a whole chunk fits (at most `max_samples_per_document` of them)."""
    splits = range(cfg.min_prefix_tokens, n_ids - cfg.suffix_tokens + 1, cfg.suffix_tokens)
    return splits if cfg.max_samples_per_document is None else splits[: cfg.max_samples_per_document]


def chunk_samples(cfg: DataConfig, tokenizer, doc_id: str, ids: list[int], truth: dict | None) -> list[Sample]:
    """Every chunk of a document as a sample; chunk c has the id `{doc_id}:{c}`."""
    return [
        make_sample(cfg, tokenizer, f"{doc_id}:{chunk}", ids, split, truth)
        for chunk, split in enumerate(chunk_splits(cfg, len(ids)))
    ]


def cut_sample(cfg: DataConfig, tokenizer, sample_id: str, text: str, truth: dict | None) -> Sample | None:
    """One sample of a document, cut the way training cuts: random, a uniform split; chunks, one of
    its chunks chosen by the id's seed. Evaluation cuts its held-out documents with this."""
    ids, _ = document_ids(cfg, tokenizer, text)
    if cfg.cut == "random":
        return random_cut(cfg, tokenizer, sample_id, ids, truth)
    splits = chunk_splits(cfg, len(ids))
    if not splits:
        return None
    split = splits[random.Random(f"split:{sample_id}").randrange(len(splits))]
    return make_sample(cfg, tokenizer, sample_id, ids, split, truth)
